"""certorch.relax"""
