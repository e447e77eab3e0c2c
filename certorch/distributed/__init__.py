"""certorch.distributed"""
