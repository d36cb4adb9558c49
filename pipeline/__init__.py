"""segmill.pipeline"""
