# CSP (ResNet-50) with BlockCopy at tau 0.5.
_base_ = "./csp_r50_blockcopy_tau0.3.py"

model = dict(blockcopy=dict(target=0.5))
