# NCCL settings for H100 nodes: 8 GPUs on NVLink 4 / NVSwitch, one 400 Gb/s NIC per GPU
# (InfiniBand or RoCE). Sourced by train.sbatch; override any of them in the environment.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Flight recorder: every rank keeps its last 2,000 collectives and dumps them on a timeout (the
# paper's hang diagnosis) into $TORCH_NCCL_DEBUG_INFO_TEMP_FILE<rank>; llama3hp's watchdog also
# dumps them, with every thread's Python stack, into <run dir>/hangs/ before it aborts a hung step.
export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-${LLAMA3HP_LOG_DIR:-logs}/nccl_trace_rank_}
# Inside a node NCCL uses NVLink by itself (P2P and NVLS on); TP groups never leave the node.
export NCCL_P2P_DISABLE=${NCCL_P2P_DISABLE:-0}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-1}
# Scale-out: use every HCA (mlx5_0..7, one per GPU) and GPUDirect RDMA.
export NCCL_IB_HCA=${NCCL_IB_HCA:-mlx5}
export NCCL_NET_GDR_LEVEL=${NCCL_NET_GDR_LEVEL:-PHB}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}  # bootstrap interface (not loopback)
# RoCE only (uncomment on RoCE fabrics): the GID index of RoCE v2 and the traffic class of the
# lossless queue your switches configure.
# export NCCL_IB_GID_INDEX=3
# export NCCL_IB_TC=106
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
