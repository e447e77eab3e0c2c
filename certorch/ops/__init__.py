"""certorch.ops"""
