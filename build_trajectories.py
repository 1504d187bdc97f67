"""
build_trajectories.py -- structured SFT trajectories by reverse synthesis (METHOD.md section 4).

Not built yet: this stage arrives with issue #3 (structured trajectories and SFT).
"""
import sys

if __name__ == "__main__":
    sys.exit("build_trajectories.py is not built yet (issue #3); synthesize.py runs the expert agent today")
