"""
rewards.py -- the three GRPO rewards R = alpha*R_task + beta*R_ref + gamma*R_beh (METHOD.md 6).

Not built yet: the rewards arrive with issue #4. The trajectory records that tools.run_episodes
returns already carry what they need: QE scores per attempt, the answer, format validity per turn.
"""
