"""The method layer: what SAM, SSAM-F, SSAM-D and SAM-ON compute, with no training loop.

``methods`` (the method table), ``optim`` (SAM/SSAM, Eq. 2-3 and Algorithm 1), ``fisher``
(Eq. 5), ``masks`` (Eq. 6-9, tensor masks, SAM-ON), ``flops`` (costs). Imports only torch.
"""
