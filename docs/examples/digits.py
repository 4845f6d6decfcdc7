"""Write scikit-learn's handwritten digits as a minivlmoe data file (docs/your_data.md).

    python docs/examples/digits.py --out digits.npz
    minivlmoe train --data digits.npz --patch 2 ...
    python docs/examples/digits.py --score RUN        # digit accuracy of the trained run

The 1797 digits of ``sklearn.datasets.load_digits`` ship inside scikit-learn (nothing is
downloaded): 8x8 grayscale images with values 0..16.  Each becomes an 8x8 RGB uint8
image (the gray value in all three channels, 0..16 -> 0..255) and gets one caption from
three templates, the template drawn at random (seed ``--seed``)::

    "a handwritten seven"   "the digit 7"   "a seven written by hand" ("an eight ...")

scikit-learn is needed by this script only; minivlmoe itself never imports it.
"""

import argparse

import numpy as np

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten {name}", "the digit {digit}", "{a} {name} written by hand")


def caption(template, digit):
    """Template ``template`` (an index into TEMPLATES) filled in for ``digit``."""
    name = NAMES[digit]
    return TEMPLATES[template].format(name=name, digit=digit,
                                      a="an" if name == "eight" else "a")


def digits_arrays(seed=0):
    """images (1797, 8, 8, 3) uint8, captions (1797,) str, labels (1797,) int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.rint(digits.images * (255 / 16)).astype(np.uint8)      # (B, 8, 8)
    images = np.repeat(gray[..., None], 3, axis=3)                    # (B, 8, 8, 3)
    labels = digits.target.astype(np.int64)                          # (B,)
    template = np.random.default_rng(seed).integers(len(TEMPLATES), size=len(labels))
    captions = [caption(t, d) for t, d in zip(template, labels)]
    return images, np.array(captions), labels


def digit_of(caption):
    """The digit a caption names (None if it names none)."""
    for word in caption.split():
        if word in NAMES:
            return NAMES.index(word)
        if word.isdigit() and len(word) == 1:
            return int(word)
    return None


def score(run):
    """Template-free accuracies of a trained run on its test split (docs/your_data.md).

    caption digit: the generated caption names the image's digit (any template);
    prompt digit: the best-matching of the 30 captions "TEMPLATE(d)" names the digit
    (a class's score is its best template, as the built-in zero-shot metric does).
    """
    import os

    from minivlmoe import evaluate, inference, run_checkpoint, run_folder, userdata
    from minivlmoe.tokenizer import PAD_ID

    ckpt, mcfg, tcfg, tok = run_checkpoint.load_checkpoint(
        os.path.join(run, run_folder.CKPT_NAME))
    data = userdata.open_source(ckpt.config["data"])
    test = data.splits(tcfg.data_seed).test
    labels = data.labels[data.test_mask(tcfg.data_seed)]             # (Bt,)
    images = test.images.astype(mcfg.dtype)                           # (Bt, R, R, 3)
    hyps = evaluate.generate_captions(ckpt.params, mcfg, images, tok)
    caption_acc = np.mean([digit_of(h) == d for h, d in zip(hyps, labels)])
    prompts = [caption(t, d) for d in range(10) for t in range(len(TEMPLATES))]
    txt = inference.encode_texts(ckpt.params, mcfg, tok.encode(prompts, mcfg.max_text_len),
                                 pad_id=PAD_ID)                       # (30, De)
    img = inference.encode_images(ckpt.params, mcfg, images)          # (Bt, De)
    class_sim = (img @ txt.T).reshape(len(labels), 10, len(TEMPLATES)).max(axis=2)
    prompt_acc = np.mean(class_sim.argmax(axis=1) == labels)
    print(f"{len(labels)} test digits: caption digit accuracy {caption_acc:.3f}, "
          f"prompt digit accuracy {prompt_acc:.3f} (chance 0.1)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="digits.npz", help="the .npz to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the templates (0)")
    parser.add_argument("--score", metavar="RUN", help="score a trained run instead")
    args = parser.parse_args()
    if args.score:
        return score(args.score)
    images, captions, labels = digits_arrays(args.seed)
    np.savez(args.out, images=images, captions=captions, labels=labels)
    print(f"wrote {args.out}: {len(captions)} images {images.shape[1]}x{images.shape[2]}, "
          f"{len(set(captions.tolist()))} distinct captions, e.g. {str(captions[0])!r}")


if __name__ == "__main__":
    main()
