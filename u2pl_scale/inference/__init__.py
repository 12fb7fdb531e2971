"""Using a trained model: load a self-describing checkpoint (checkpoint.py), predict masks (predictor.py,
images.py), evaluate (evaluation.py) and export (export.py). The launchers are launchers/evaluate.py, predict.py
and export.py. (Nothing is imported here, so launch.py starts ranks without loading torch.)"""
