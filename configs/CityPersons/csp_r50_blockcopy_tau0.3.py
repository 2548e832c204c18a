# CSP (ResNet-50) with BlockCopy at tau 0.3: every convolution (backbone, neck, head) block-sparse on
# 128-px blocks, the policy warmed up on 400 train clips, then learning online over the val clips.
_base_ = "./csp_r50_dense.py"

model = dict(
    _delete_=True,
    type="BlockCopyDetector",
    detector={{_base_.model}},
    blockcopy=dict(block_size=128, target=0.3))  # the other fields: blockcopy_core.BlockCopyConfig's defaults
test_dataloader = dict(dataset=dict(clip_length=20))
custom_hooks = [dict(type="BlockCopyHook", warmup_dataset={{_base_.warmup_dataset}})]
