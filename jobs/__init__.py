"""segmill.jobs"""
