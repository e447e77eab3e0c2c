"""certorch.models"""
