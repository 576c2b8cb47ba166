"""The names of the run directory's artifacts, in one place (see ../shared/DESIGN.md's run-directory table).

Stage modules, the pipeline, the benchmarks and the report read these names from here, so renaming an artifact is
one edit. This module imports nothing, so the CLI can know the pipeline's shape without loading torch.
"""

MANIFEST = "manifest.json"
CLASSIFIER_CKPT = "classifier.ckpt"  # fit-classifier
# fit-classifier: (epochs, train images) margins of each training image's given label, recorded while it trained
# defuse's classifier; (0, train images) for a classifier the user brought (no training to watch)
TRAINING_MARGINS = "training_margins.npy"
GENERATOR_CKPT = "generator.ckpt"  # fit-generator
FAILURES_TABLE = "failures.parquet"  # identify
FAILURES_Z = "failures_z.npy"  # identify
VALIDITY_MODEL = "validity.npz"  # identify
REGIONS_JSON = "regions.json"  # distill
REGIONS_DIR = "regions"  # distill: region_XX.npz (mean, cov) and region_XX.png (sample grid)
UMAP_PNG = "umap.png"  # distill
LABELS_FILE = "labels.jsonl"  # label
LABELS_FOR = "labels.regions-sha256"  # label: which regions.json the answers in labels.jsonl belong to
CORRECT_DIR = "correct"  # correct: resumable checkpoints of every (lambda, epoch)
REPAIRED_CKPT = "repaired.ckpt"  # correct
LABEL_ISSUES = "label_issues.csv"  # correct: labels the person's answers contradict
LABEL_REVIEW = "label_review.csv"  # defuse review: a person's answer on each label issue (image,label)
LABEL_REVIEW_TODO = "label_review_todo.csv"  # defuse review without a terminal: the label issues to answer
VERIFY_JSON = "verify.json"  # verify
CHECKS_DIR = "checks"  # check-before, check-after: <name>.json, <name>_ei.npz, matrices (.npy) and heat maps (.png)
CHECK_BEFORE = "checks/before.json"  # check-before
CHECK_AFTER = "checks/after.json"  # check-after
DRIFT_TOLERANCE = "checks/drift_tolerance.json"  # check-after: the tolerated drift before and after the repair
REPORT_DIR = "report"  # report
REPORT_HTML = "report/index.html"  # report: self-contained (images embedded)
REPORT_JSON = "report/report.json"  # report: every figure, under the keys docs/report.md documents
REPORT_MD = "report/report.md"  # report: short, for a pull request

# The stages in the order `defuse run` runs them (defuse.pipeline.STAGES declares them; a test keeps the two in
# step), for whoever needs the order without loading the stages: the report's timings, the CLI.
STAGE_NAMES = ("fit-classifier", "fit-generator", "identify", "distill", "check-before", "label", "correct", "verify",
               "check-after", "report")
AWAITING_LABELS = "awaiting labels"  # a stage not run, and a run's status, while regions await a person's labels
