# MGAN (VGG-16) with BlockCopy at tau 0.3: backbone and RPN head block-sparse on 128-px blocks; proposals,
# RoIAlign, the mask-guided attention and the box head dense on the dense features.
_base_ = "./mgan_vgg16_dense.py"

model = dict(
    _delete_=True,
    type="BlockCopyDetector",
    detector={{_base_.model}},
    blockcopy=dict(block_size=128, target=0.3))  # the other fields: blockcopy_core.BlockCopyConfig's defaults
test_dataloader = dict(dataset=dict(clip_length=20))
custom_hooks = [dict(type="BlockCopyHook", warmup_dataset={{_base_.warmup_dataset}})]
