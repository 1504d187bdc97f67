"""The data section: the toy world, and the MVTec-AD and VisA loaders on tiny fixtures written here."""
import numpy as np
import pytest
from PIL import Image

import tools


def png(path, value=128, size=16, mask=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask:
        a = np.zeros((size, size), np.uint8)
        a[4:8, 4:8] = 255
    else:
        a = np.full((size, size, 3), value, np.uint8)
    Image.fromarray(a).save(path)


# ---- toy world ---------------------------------------------------------------------------------

def test_toy_world_layout_counts_and_groups(toy, toy_root):
    kinds = list(toy.kinds.values())
    assert kinds.count("texture") >= 3 and kinds.count("object") >= 3
    types = {t for c in toy.categories for t in toy.types(c)}
    assert len(types) >= 8 and all(3 <= len(toy.types(c)) <= 4 for c in toy.categories)
    assert set(toy.train_categories).isdisjoint(toy.eval_categories)
    assert set(toy.train_categories) | set(toy.eval_categories) == set(toy.categories)
    for c in toy.categories:
        assert len(toy.train_good[c]) >= 20 and len(toy.test_good[c]) >= 10
        for t in toy.types(c):
            found = toy.anomalies_of(c, t)
            assert len(found) >= 15
            assert all(a.mask == toy_root / c / "ground_truth" / t / f"{a.image.stem}_mask.png" for a in found)
    assert toy.load(toy.train_good["wood"][0]).shape == (128, 128, 3)


def test_toy_world_is_deterministic_and_masks_are_exact(tmp_path):
    counts = {"train_good": 2, "test_good": 1, "per_type": 3}
    for name in ("a", "b"):
        tools.generate_toy_world(tmp_path / name, size=64, seed=3, counts=counts, categories=["nut", "wood"])
    for f in sorted((tmp_path / "a").rglob("*.png")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
    for cat, spec in tools.TOY_CATEGORIES.items():
        for t in spec["types"]:
            rng = np.random.default_rng([1, tools.stable_seed(cat, t)])
            image, fg = tools.render_normal(cat, rng, 96)
            out, mask = tools.render_anomaly(cat, t, image, fg, rng)
            assert mask.any() and np.array_equal(out[~mask], image[~mask]), (cat, t)
            assert tools.change_map(image, out)[mask].mean() > 15, (cat, t)
            if spec["kind"] == "object":
                assert (mask <= fg).all(), (cat, t)


def test_toy_images_vary_in_pose_and_lighting(toy):
    a, b = (toy.load(p).astype(float) for p in toy.train_good["washer"][:2])
    assert np.abs(a - b).mean() > 3
    fa, fb = (tools.foreground_mask(toy.load(p), "object") for p in toy.train_good["washer"][:2])
    assert (fa ^ fb).sum() > 20              # the object moved or turned


def test_split_is_first_third_by_file_name(toy):
    refs, test = toy.split("wood", "hole")
    assert len(refs) == 5 and len(test) == 10
    names = [a.image.name for a in refs + test]
    assert names == sorted(names)


# ---- MVTec-AD ----------------------------------------------------------------------------------

@pytest.fixture
def mvtec(tmp_path):
    root = tmp_path / "mvtec"
    for i in range(3):
        png(root / "bottle" / "train" / "good" / f"{i:03d}.png")
    png(root / "bottle" / "test" / "good" / "000.png")
    for i in range(4):
        png(root / "bottle" / "test" / "broken_large" / f"{i:03d}.png", value=40)
        png(root / "bottle" / "ground_truth" / "broken_large" / f"{i:03d}_mask.png", mask=True)
    return root


def test_mvtec_loader_reads_the_published_layout(mvtec):
    ds = tools.load_dataset("mvtec", mvtec, size=32)
    assert ds.categories == ["bottle"] and ds.types("bottle") == ["broken_large"]
    assert ds.kinds["bottle"] == "object"
    assert len(ds.train_good["bottle"]) == 3 and len(ds.test_good["bottle"]) == 1
    refs, test = ds.split("bottle", "broken_large")
    assert [a.image.name for a in refs] == ["000.png", "001.png"] and len(test) == 2
    assert ds.load(refs[0].image).shape == (32, 32, 3)
    mask = ds.load_mask(refs[0].mask)
    assert mask.shape == (32, 32) and 0 < mask.mean() < 0.5


def test_mvtec_loader_errors_name_the_problem(mvtec, tmp_path):
    with pytest.raises(tools.UserError, match="needs --data-root"):
        tools.load_dataset("mvtec")
    with pytest.raises(tools.UserError, match="does not exist"):
        tools.load_dataset("mvtec", tmp_path / "nowhere")
    with pytest.raises(tools.UserError, match="train/good"):
        tools.load_dataset("mvtec", tmp_path)
    ds = tools.load_dataset("mvtec", mvtec)
    with pytest.raises(tools.UserError, match="unknown category 'hazelnut'.*known: bottle"):
        ds.check_category("hazelnut")
    (mvtec / "bottle" / "train" / "good" / "001.png").write_bytes(b"not a png")
    with pytest.raises(tools.UserError, match="cannot read image .*001.png"):
        ds.load(ds.train_good["bottle"][1])
    (mvtec / "bottle" / "ground_truth" / "broken_large" / "003_mask.png").unlink()
    with pytest.raises(tools.UserError, match="missing mask .*003_mask.png"):
        tools.load_dataset("mvtec", mvtec)


# ---- VisA --------------------------------------------------------------------------------------

@pytest.fixture
def visa(tmp_path):
    root = tmp_path / "visa"
    rows = ["object,split,label,image,mask"]
    anno = ["image,label,mask"]
    for i in range(3):
        img = f"candle/Data/Images/Normal/{i:04d}.JPG"
        png(root / img)
        rows.append(f"candle,{'train' if i < 2 else 'test'},normal,{img},")
        anno.append(f"{img},normal,")
    labels = ["chunk of wax missing", "chunk of wax missing", "weird candle wick",
              '"extra wax in candle,wax melded out of the candle"']
    for i, label in enumerate(labels):
        img, mask = f"candle/Data/Images/Anomaly/{i:03d}.JPG", f"candle/Data/Masks/Anomaly/{i:03d}.png"
        png(root / img, value=60)
        png(root / mask, mask=True)
        rows.append(f"candle,test,anomaly,{img},{mask}")
        anno.append(f"{img},{label},{mask}")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    (root / "candle" / "image_anno.csv").write_text("\n".join(anno) + "\n")
    return root


def test_visa_loader_reads_split_csv_and_image_anno(visa):
    ds = tools.load_dataset("visa", visa, size=32)
    assert ds.categories == ["candle"] and ds.train_categories == ["candle"]
    assert len(ds.train_good["candle"]) == 2 and len(ds.test_good["candle"]) == 1
    assert ds.types("candle") == ["chunk_of_wax_missing", "combined", "weird_candle_wick"]
    a = ds.anomalies_of("candle", "chunk_of_wax_missing")[0]
    assert ds.load_mask(a.mask).any()
    assert tools.KnowledgeBase().lookup("candle", "chunk of wax missing", "visa")["category"] == "candle"


def test_visa_loader_errors_name_the_problem(visa):
    (visa / "candle" / "image_anno.csv").unlink()
    with pytest.raises(tools.UserError, match="image_anno.csv not found"):
        tools.load_dataset("visa", visa)
    (visa / "split_csv" / "1cls.csv").write_text("object,image\ncandle,x.JPG\n")
    with pytest.raises(tools.UserError, match="must have the columns"):
        tools.load_dataset("visa", visa)
    (visa / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(tools.UserError, match="1cls.csv not found"):
        tools.load_dataset("visa", visa)


def test_toy_world_never_writes_over_other_files(tmp_path, toy_root):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(tools.UserError, match="is not a toy world"):
        tools.load_dataset("toy", tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    with pytest.raises(tools.UserError, match="size 128.*--size 128"):
        tools.load_dataset("toy", toy_root, size=64)


def test_atomic_writes_replace_whole_files_and_name_the_file_they_cannot_write(tmp_path):
    tools.write_atomic(tmp_path / "a" / "notes.txt", "old")
    tools.write_atomic(tmp_path / "a" / "notes.txt", "new")
    tools.write_atomic(tmp_path / "a" / "raw.bin", b"\x00\x01")
    tools.write_json(tmp_path / "a" / "settings.json", {"lr": 0.001})
    tools.save_png(np.ones((4, 4), bool), tmp_path / "a" / "mask.png")
    assert (tmp_path / "a" / "notes.txt").read_text() == "new"
    assert (tmp_path / "a" / "raw.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "a" / "settings.json").read_text() == '{\n "lr": 0.001\n}'
    assert tools.load_mask(tmp_path / "a" / "mask.png").all()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["mask.png", "notes.txt", "raw.bin", "settings.json"]
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(tools.UserError, match=f"cannot write {tmp_path / 'file' / 'x.png'}: "):
        tools.save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "file" / "x.png")


# ---- real files as they come: normal-only categories, a plain folder of photos, odd formats ------

def test_a_category_with_normal_images_only_gets_its_types_from_the_knowledge_base(mvtec, capsys):
    for i in range(2):
        png(mvtec / "cable" / "train" / "good" / f"{i:03d}.png")
    png(mvtec / "hazelnut" / "test" / "crack" / "000.png")            # anomalies, no normal images
    png(mvtec / "hazelnut" / "ground_truth" / "crack" / "000_mask.png", mask=True)
    ds = tools.load_dataset("mvtec", mvtec, size=32)
    kb_types = sorted(tools.KnowledgeBase().data["mvtec"]["cable"]["types"])
    assert ds.types("cable") == [] and ds.synthesis_types("cable") == kb_types
    plan = tools.plan_tasks(ds, "cable,hazelnut", per_type=1)
    assert sorted(p["anomaly_type"] for p in plan) == kb_types
    assert "note: hazelnut has no normal images" in capsys.readouterr().out
    # on-disk types and knowledge types together; an unknown type is accepted with a notice
    assert "broken_small" in {p["anomaly_type"] for p in tools.plan_tasks(ds, "bottle", per_type=1)}
    plan = tools.plan_tasks(ds, "cable", "bent_wire,melted_goo", per_type=1)
    assert [p["anomaly_type"] for p in plan] == ["bent_wire", "melted_goo"]
    notices = capsys.readouterr().out.splitlines()
    assert len(notices) == 1 and "knowledge retrieval has nothing for 'melted_goo'" in notices[0]
    with pytest.raises(tools.UserError, match="no normal images to synthesize on in hazelnut"):
        tools.plan_tasks(ds, "hazelnut")


def test_images_reads_a_plain_folder_of_photos_as_one_category(tmp_path):
    folder = tmp_path / "my photos"
    png(folder / "a.png")
    Image.fromarray(np.full((16, 16), 90, np.uint8)).save(folder / "b.png")                # grey
    Image.fromarray(np.full((16, 16, 4), 200, np.uint8), "RGBA").save(folder / "c.png")     # RGBA
    ds = tools.load_dataset("images", folder, size=32, categories="screw")
    assert ds.categories == ["screw"] and len(ds.train_good["screw"]) == 3
    assert ds.synthesis_types("screw") == sorted(tools.KnowledgeBase().data["mvtec"]["screw"]["types"])
    assert [ds.load(p)[0, 0].tolist() for p in ds.train_good["screw"]] == [[128] * 3, [90] * 3, [200] * 3]
    assert tools.load_dataset("images", folder).categories == ["my_photos"]
    with pytest.raises(tools.UserError, match="one category"):
        tools.load_dataset("images", folder, categories="screw,cable")
    with pytest.raises(tools.UserError, match="no images"):
        tools.load_dataset("images", tmp_path)


def test_16_bit_pngs_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    image = tools.load_image(tmp_path / "deep.png")
    assert image.shape == (32, 32, 3) and image[0, 0, 0] == 0 and image[-1, -1, 0] == 255
    assert abs(image.mean() - 127.5) < 2            # clipping would make almost every pixel 255
    mask = np.zeros((32, 32), np.uint16)
    mask[:4] = 65535
    Image.fromarray(mask).save(tmp_path / "deep_mask.png")
    assert tools.load_mask(tmp_path / "deep_mask.png").sum() == 4 * 32


def test_a_mask_of_another_size_is_a_one_line_error_naming_both_files(mvtec):
    png(mvtec / "bottle" / "ground_truth" / "broken_large" / "002_mask.png", mask=True, size=24)
    ds = tools.load_dataset("mvtec", mvtec, size=32)
    good, bad = ds.anomalies_of("bottle", "broken_large")[1:3]
    assert ds.load_anomaly(good)[1].shape == (32, 32)
    with pytest.raises(tools.UserError, match=r"mask .*002_mask.png is 24x24 but its image .*002.png is 16x16"):
        ds.load_anomaly(bad)


def test_one_process_is_rank_0_of_1_and_shards_split_in_order(monkeypatch):
    """Without torchrun every distributed helper is a no-op; under it, the ranks' contiguous shards
    differ in length by at most one and, joined in rank order, give the items back."""
    assert (tools.rank(), tools.world_size(), tools.is_main()) == (0, 1, True)
    assert tools.shard(list(range(5))) == list(range(5)) and tools.all_gather("x") == ["x"]
    assert tools.all_reduce_sum([2, 3]) == [2, 3] and tools.on_main(lambda a: a + 1, 1) == 2
    for world in (2, 3, 7):
        monkeypatch.setattr(tools, "world_size", lambda: world)
        shards = []
        for r in range(world):
            monkeypatch.setattr(tools, "rank", lambda: r)
            shards.append(tools.shard(list(range(10))))
        assert sum(shards, []) == list(range(10)) and max(map(len, shards)) - min(map(len, shards)) <= 1
