"""The tuning layer: the search on Ray Tune and Optuna.

``space`` (search-space YAML), ``study`` (the Optuna study), ``ranking`` (MO-ASHA's
non-dominated ranking, no Ray), ``search`` (the searcher), ``schedulers``, ``trainable``,
``tuner`` (building and running the Ray Tune experiment), ``progress``, ``retention``,
``_private`` (the only private Ray/Optuna attributes). Imports training, method, storage.
"""
