# MGAN (VGG-16), dense, on CityPersons val: the reference for the BlockCopy config beside it.
_base_ = ["../_base_/models/mgan_vgg16.py", "../_base_/datasets/citypersons_video.py",
          "mmdet::_base_/default_runtime.py"]

custom_imports = dict(imports=["blockcopy_mmdet"], allow_failed_imports=False)
randomness = dict(seed=0)
# A dense detector keeps no state between frames: only the scored frame of each clip needs to run.
test_dataloader = dict(dataset=dict(clip_length=1))
