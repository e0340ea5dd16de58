"""Scale-out on torch.distributed: a tensor-parallel decoder (tensor_parallel.py), the all-ranks error exit
and rank-0 output (launch.py). The data-parallel batch job is runtime/batch.py."""
