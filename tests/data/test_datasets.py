import torch
from torch.utils.data import DataLoader

from synthlearn.data.datasets import CaseDataset, collate_cases
from synthlearn.data.layouts import open_study
from synthlearn.data.preprocess import PreprocessConfig


def test_case_dataset_items_and_batches(tiny_study):
    cases = open_study(tiny_study).sites[0].cases[:3]
    ds = CaseDataset(cases, PreprocessConfig(shape=(24, 24, 24)))
    item = ds[0]
    assert item["image"].shape == (4, 24, 24, 24) and item["image"].dtype == torch.float32
    assert item["seg"].shape == (24, 24, 24) and item["seg"].dtype == torch.int64
    assert item["case_id"] == cases[0].case_id and item["labels"] == cases[0].labels
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate_cases)))
    assert batch["image"].shape == (2, 4, 24, 24, 24) and len(batch["case_id"]) == 2
    assert ds.arrays(0)[0] is ds.arrays(0)[0]  # cached
