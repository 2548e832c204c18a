# CityPersons on Cityscapes video: every annotated val image is the last frame of a 20-frame clip from
# leftImg8bit_sequence; only that frame is scored, with the official CityPersons miss rates. Layout:
#   data/cityscapes/leftImg8bit_sequence/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
#   data/CityPersons/val_gt.json, data/CityPersons/train.json   (Pedestron's annotation files)
# The configs that use it import blockcopy_mmdet (custom_imports), which registers the dataset, sampler and metric.

dataset_type = "CityPersonsVideoDataset"
data_root = "data/"
meta_keys = ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor", "clip_id", "frame_id", "clip_length",
             "annotated")
test_pipeline = [
    dict(type="LoadImageFromFile"),  # 2048x1024, no resizing (as Pedestron tests CSP and MGAN)
    dict(type="PackDetInputs", meta_keys=meta_keys),
]
test_dataloader = dict(
    batch_size=1,  # N clips at once as N streams: batch_size=N with batch_sampler=dict(type="ClipBatchSampler")
    num_workers=2,
    persistent_workers=False,
    drop_last=False,
    sampler=dict(type="ClipSampler"),  # frames in order, whole clips per process
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file="CityPersons/val_gt.json",
        data_prefix=dict(img="cityscapes/leftImg8bit_sequence/val/"),
        clip_length=20,
        test_mode=True,
        pipeline=test_pipeline))
test_evaluator = dict(type="CityPersonsMetric", ann_file=data_root + "CityPersons/val_gt.json")
test_cfg = dict(type="TestLoop")

# The clips BlockCopy's policy warms up on before testing (BlockCopyHook).
warmup_dataset = dict(
    test_dataloader["dataset"],
    ann_file="CityPersons/train.json",
    data_prefix=dict(img="cityscapes/leftImg8bit_sequence/train/"))
