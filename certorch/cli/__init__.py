"""certorch.cli"""
