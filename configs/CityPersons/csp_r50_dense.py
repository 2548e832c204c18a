# CSP (ResNet-50), dense, on CityPersons val: the reference for the BlockCopy configs beside it.
_base_ = ["../_base_/models/csp_r50.py", "../_base_/datasets/citypersons_video.py", "mmdet::_base_/default_runtime.py"]

custom_imports = dict(imports=["blockcopy_mmdet"], allow_failed_imports=False)
randomness = dict(seed=0)
# A dense detector keeps no state between frames: only the scored frame of each clip needs to run.
test_dataloader = dict(dataset=dict(clip_length=1))
