"""memtrain.planner"""
