"""inres-bench harness: runs the paper's protocol over the model zoo and any adapter."""
