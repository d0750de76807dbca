"""The shared locate-then-edit machinery: one place per concept.

tokens      subject-last-token lookup and right-padded batch encoding
context     seeded context templates sampled from the unedited model
targets     target-vector optimisation for a whole batch of requests at once
keys        key vectors (inputs of the MLP down-projection) averaged over context templates
covariance  second-moment statistics E[k kᵀ] with a content-addressed disk cache
update      the least-squares (MEMIT/PMET) and rank-one (ROME) weight solves
"""
