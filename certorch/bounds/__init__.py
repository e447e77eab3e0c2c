"""certorch.bounds"""
