"""certorch.train"""
