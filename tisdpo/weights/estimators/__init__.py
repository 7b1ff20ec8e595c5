"""Token-weight estimators, one file each: ``<name>.py`` holds ``ESTIMATOR = EstimatorRecord(...)``
(``record.py``) and ``conf/estimator/<name>.yaml`` its options. The yaml files are the list of names
(``tisdpo.registry.estimator_record``); nothing else names an estimator."""
