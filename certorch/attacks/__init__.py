"""certorch.attacks"""
