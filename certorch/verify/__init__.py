"""certorch.verify"""
