"""certorch.nn"""
