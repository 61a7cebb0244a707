# A small residual network + ASPP head: the CPU demo and the tests. Not a paper setting.
model = dict(
    type='cssbench.IncrementalSegmentor',
    backbone=dict(type='cssbench.SmallResNet', widths=(32, 64, 96, 128)),
    decode_head=dict(type='cssbench.ASPPHead', channels=64, dilations=(1, 2, 3)),
    classifier_dropout=0.1,
)
# Batch 8, not 16: on the synthetic data twice the updates per epoch learn far faster.
data = dict(crop_size=64, batch_size=8, eval_batch_size=64, num_workers=1)
# lr[0] at step 0, lr[1] at later steps; poly decay per iteration; the last epoch is kept
# (never selected on the val set, which is the test set).
schedule = dict(epochs=10, lr=(0.05, 0.005), momentum=0.9, nesterov=True, weight_decay=1e-4,
                poly_power=0.9)
