"""certorch.train.objectives"""
