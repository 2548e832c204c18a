# CSP with a ResNet-50 (Pedestron's configs/elephant/cityperson/csp_r50.py), for inference.
custom_imports = dict(imports=["blockcopy_mmdet.models"], allow_failed_imports=False)

model = dict(
    type="CSP",
    # Pedestron normalises RGB images with the ImageNet statistics and pads test images to multiples of 128
    # (with zeros after normalisation, as DetDataPreprocessor does); mmdet loads images as BGR.
    data_preprocessor=dict(
        type="DetDataPreprocessor",
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=128),
    # Stages at strides 4, 8, 16 and 16: the last stage is dilated instead of strided.
    backbone=dict(
        type="ResNet",
        depth=50,
        num_stages=4,
        strides=(1, 2, 2, 1),
        dilations=(1, 1, 1, 2),
        out_indices=(1, 2, 3),
        frozen_stages=-1,
        norm_cfg=dict(type="BN", requires_grad=True),
        norm_eval=False,
        style="pytorch"),
    neck=dict(
        type="CSPNeck",
        in_channels=[512, 1024, 2048],
        out_channels=256,
        upsample_strides=(2, 4, 4),
        kernel_size=4,
        l2_norm_scale=10.0,
        l2_norm_eps=1e-10),
    bbox_head=dict(
        type="CSPHead",
        num_classes=1,
        in_channels=768,
        feat_channels=256,
        stacked_convs=1,
        strides=(4,),
        wh_ratio=0.41,
        norm_cfg=dict(type="GN", num_groups=32, requires_grad=True)),
    train_cfg=None,
    test_cfg=dict(
        nms_pre=1000,
        score_thr=0.1,
        # offset=1: Pedestron's NMS measures boxes in MMDetection 1.x's pixel convention (x2 - x1 + 1).
        nms=dict(type="nms", iou_threshold=0.5, offset=1),
        max_per_img=100))
