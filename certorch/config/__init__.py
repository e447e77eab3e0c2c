"""certorch.config"""
