"""certorch.graph"""
