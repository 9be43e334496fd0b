"""sdmp_fast.pipelines: loaders (DALI, FFCV, torchvision, torch-gpu) that yield SDMPBatch."""
