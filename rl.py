"""
rl.py -- hand-written multi-turn GRPO with the three rewards (METHOD.md sections 5-6).

Not built yet: this stage arrives with issue #4 (GRPO and rewards).
"""
import sys

if __name__ == "__main__":
    sys.exit("rl.py is not built yet (issue #4); synthesize.py runs the expert agent today")
