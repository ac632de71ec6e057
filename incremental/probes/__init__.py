"""Robustness probes run after every incremental step (``probes:`` in the run YAML).

Modules: ``corruptions`` (ImageNet-C, and the public :func:`corruptions.corrupt`),
``masking``, ``fourier``, ``adversarial`` (PGD accuracy and ``dct_spectrum``), ``ood``;
``base`` (what a probe sees), ``suite`` (the Avalanche plugin), ``attacks`` (PGD, DeepFool)
and ``offline`` (``incremental probe RUN_DIR``). Importing this package stays light: the
modules load on use.
"""

# What each probe's numbers mean; copied into metrics.json next to the accuracy definitions.
DEFINITIONS = {
    "probes": "results after each experience on a fixed random subsample of the test images of the "
              "classes seen so far (num_samples), in [0, 1] pixel space; accuracies and errors in %",
    "corruptions.accuracy": "accuracy per corruption and severity (ImageNet-C corruptions; CIFAR-10-C "
                            "severity tables up to 64 px, ImageNet-C's above)",
    "corruptions.mce": "mean over corruptions c of 100 * sum_s E[s,c] / sum_s E_ref[s,c], E the error, ref "
                       "the reference run at the same step (Hendrycks and Dietterich 2019)",
    "corruptions.relative_mce": "mean over c of 100 * sum_s (E[s,c] - E_clean) / sum_s (E_ref[s,c] - E_ref_clean)",
    "masking": "accuracy with one square CutOut hole of the given area fraction (zero-filled), and with "
               "that fraction of the token grid's cells blanked (patch drop, token models only)",
    "fourier.error_map": "error under x + r * eps * U_ij (U_ij the unit-L2 real Fourier basis image of "
                         "frequency (i, j), r = +-1 per image and channel, clipped to [0, 1]); zero "
                         "frequency at the centre; bands: thirds of |f| / (sqrt(2) * Nyquist)",
    "dct_spectrum": "mean squared orthonormal 2-D DCT-II coefficients of the adversarial perturbations; "
                    "band shares over thirds of (u + v) / (H + W - 2)",
    "adversarial": "accuracy under PGD (random start, step 2.5 eps / steps) with cross-entropy, "
                   "budgets in [0, 1] pixel units",
    "ood": "in-distribution = seen-class test images (positives), OOD = future classes or another "
           "dataset; AUROC, and FPR on OOD at the threshold keeping 95% of in-distribution images; "
           "scores: max softmax (msp), max logit, logsumexp of logits (energy); worst_* after PGD "
           "on the OOD images maximising the score",
}
