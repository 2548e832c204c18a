# ruff: noqa: C408  (MMDetection configs spell their nested settings as dict(...))
# MGAN with a VGG-16 backbone (one stride-8 map), as Pedestron's configs/elephant/cityperson/mgan_vgg.py at
# test time, in MMDetection 3 terms; inference only (blockcopy_mmdet/models/mgan.py). Pedestron is
# MMDetection 0.6: its anchors, box decoding, RoIAlign and NMS count box sides as x2 - x1 + 1, hence the
# legacy components and NMS offset=1 below. Its classifier has the background first; MMDetection 3's has
# it last (convert checkpoints with blockcopy_mmdet.models.mgan_convert.convert_pedestron_mgan).
custom_imports = dict(imports=["blockcopy_mmdet.models"], allow_failed_imports=False)

model = dict(
    type="MGAN",
    data_preprocessor=dict(
        type="DetDataPreprocessor",
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=32),
    backbone=dict(type="VGGStride8", depth=16, frozen_stages=1),
    rpn_head=dict(
        type="RPNHead",
        in_channels=512,
        feat_channels=512,
        anchor_generator=dict(
            type="LegacyAnchorGenerator",
            center_offset=0.5,  # 0.6's anchor centre (base_size - 1) / 2
            base_sizes=[8],
            scales=[4.0, 5.4, 7.2, 9.8, 13.2, 17.9, 24.2, 33.0, 44.1, 59.6, 80.0],
            ratios=[2.44],  # height / width
            strides=[8]),
        bbox_coder=dict(
            type="PedestronDeltaXYWHBBoxCoder", target_means=[0.0, 0.0, 0.0, 0.0], target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0)),
    roi_head=dict(
        type="MGANRoIHead",
        bbox_roi_extractor=dict(
            type="LegacySingleRoIExtractor",
            roi_layer=dict(type="LegacyRoIAlign", output_size=7, sampling_ratio=2),
            out_channels=512,
            featmap_strides=[8]),
        mgan_head=dict(type="MGANAttention", in_channels=512, conv_channels=512, num_convs=2),
        bbox_head=dict(
            type="Shared2FCBBoxHead",
            in_channels=512,
            fc_out_channels=1024,
            roi_feat_size=7,
            num_classes=1,  # person; Pedestron's num_classes=2 counted the background
            bbox_coder=dict(
                type="PedestronDeltaXYWHBBoxCoder",
                target_means=[0.0, 0.0, 0.0, 0.0],
                target_stds=[0.1, 0.1, 0.2, 0.2]),
            reg_class_agnostic=False,
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0))),
    test_cfg=dict(
        rpn=dict(
            nms_pre=12000,
            max_per_img=2000,  # Pedestron's nms_post and max_num
            nms=dict(type="nms", iou_threshold=0.7, offset=1),
            min_bbox_size=-1),  # Pedestron's min_bbox_size=0 filters nothing; MMDetection 3's 0 drops empty boxes
        rcnn=dict(
            score_thr=0.0,
            nms=dict(type="nms", iou_threshold=0.5, offset=1),
            max_per_img=100)))
