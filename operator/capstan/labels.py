"""Every label key, annotation key and resource name Capstan reads or writes, in one place.

Other modules import these constants rather than spelling the strings: a key written by the
planner and read back by the operator (or by a test) is then the same key by construction.
"""

from __future__ import annotations

# -- Kubernetes' recommended labels, on every child object -------------------------------------
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
#: The label the API server sets on every Namespace (NetworkPolicy namespace selectors).
LABEL_NAMESPACE_NAME = "kubernetes.io/metadata.name"

# -- Capstan's labels and annotations on its children ------------------------------------------
LABEL_JOB = "capstan.dev/trainingjob"
LABEL_JOB_UID = "capstan.dev/trainingjob-uid"
LABEL_RANK = "capstan.dev/rank"
LABEL_ATTEMPT = "capstan.dev/attempt"
LABEL_SERVING = "capstan.dev/modelserving"
LABEL_REVISION = "capstan.dev/revision"
#: On every pod of a multi-host serving replica (leader and workers): the ModelServing, the revision,
#: and, for Capstan-managed groups, the group index and the pod's rank in it (0: the leader).
LABEL_GROUP_OF = "capstan.dev/serving-group-of"
LABEL_GROUP_REVISION = "capstan.dev/group-revision"
LABEL_GROUP = "capstan.dev/group"
LABEL_GROUP_RANK = "capstan.dev/group-rank"
#: The label LeaderWorkerSet gives every pod of one group (the same value across the group).
LWS_GROUP_KEY = "leaderworkerset.sigs.k8s.io/group-key"
#: On a preemptible TrainingJob: the ModelServing whose rollout borrows its GPUs (set and removed by
#: the ModelServing's reconcile; the TrainingJob's stops its gang while it is there).
LENT_TO_ANNOTATION = "capstan.dev/lent-to"
#: On a Capstan-managed group revision (a ControllerRevision): how many groups it should run.
ANNOTATION_REPLICAS = "capstan.dev/replicas"
#: Pods record the gang size and a digest of the spec they were made from, so a spec change is
#: seen on a running gang (capstan.training.lifecycle restarts it: Resized, SpecChanged).
LABEL_WORKERS = "capstan.dev/workers"
SPEC_DIGEST_ANNOTATION = "capstan.dev/spec-digest"
#: On a ModelServing revision's Deployment: the model it serves.
ANNOTATION_MODEL = "capstan.dev/model"
#: On a revision Deployment: its runtime (the endpoint picker of its InferencePool reads its metrics).
ANNOTATION_RUNTIME = "capstan.dev/runtime"
#: On a checkpoint VolumeSnapshot: why it was taken, the training step and the gang attempt.
LABEL_SNAPSHOT_REASON = "capstan.dev/snapshot-reason"
ANNOTATION_STEP = "capstan.dev/step"
ANNOTATION_ATTEMPT = "capstan.dev/attempt"
#: On a TrainingJob: skip the admission webhook's capacity check.
SKIP_CAPACITY_ANNOTATION = "capstan.dev/skip-capacity-check"
#: The scrape annotations Prometheus' common pod discovery config reads (serving pods).
PROMETHEUS_SCRAPE_ANNOTATION = "prometheus.io/scrape"
PROMETHEUS_PORT_ANNOTATION = "prometheus.io/port"
PROMETHEUS_PATH_ANNOTATION = "prometheus.io/path"
#: Kopf's finalizer on Capstan's objects.
FINALIZER = "capstan.dev/finalizer"

# -- Kueue (when spec.queueName hands the gang to Kueue) ---------------------------------------
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_POD_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_POD_GROUP_COUNT = "kueue.x-k8s.io/pod-group-total-count"
KUEUE_REQUIRED_TOPOLOGY = "kueue.x-k8s.io/podset-required-topology"
KUEUE_PREFERRED_TOPOLOGY = "kueue.x-k8s.io/podset-preferred-topology"

#: Label and annotation prefixes Capstan (and Kueue, through Capstan) write on worker pods.
OWNED_META_PREFIXES = ("capstan.dev/", "kueue.x-k8s.io/", "app.kubernetes.io/")
#: Multus' networks annotation (spec.network.networks: the RDMA NICs).
MULTUS_ANNOTATION = "k8s.v1.cni.cncf.io/networks"

# -- Nodes: resource names and labels (NVIDIA GPU Feature Discovery, topology) -----------------
GPU_RESOURCE = "nvidia.com/gpu"
#: Extended resources of RDMA devices are named ``rdma/<device>``.
RDMA_PREFIX = "rdma/"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_COUNT_LABEL = "nvidia.com/gpu.count"
#: The NVLink domain (GB200 NVL72 clique), the smallest topology level.
GPU_CLIQUE_LABEL = "nvidia.com/gpu.clique"
RACK_LABEL = "capstan.dev/rack"
BLOCK_LABEL = "capstan.dev/block"
ZONE_LABEL = "topology.kubernetes.io/zone"

#: Rank 0's pod annotation the trainer watches (downward API): a checkpoint request ``<id>:stop``.
REQUEST_ANNOTATION = "capstan.dev/checkpoint-request"
#: The DeepSpeed hostfile of a ``launcher: deepspeed`` gang, on every worker pod; the downward API
#: mounts it at /etc/capstan/hostfile (no ConfigMap to create, own or clean up).
HOSTFILE_ANNOTATION = "capstan.dev/deepspeed-hostfile"
#: A TrainingJob annotation: any new value asks for a checkpoint now, without stopping.
CHECKPOINT_NOW_ANNOTATION = "capstan.dev/checkpoint-now"
