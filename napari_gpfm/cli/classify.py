"""`gpfm classify train|predict`: an ROI classifier (linear probe) with QuPath GeoJSON in and out."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("classify", help="train a tile classifier from labelled regions, or apply one")
    cmds = p.add_subparsers(dest="classify_command", metavar="ACTION", required=True)

    t = cmds.add_parser("train", help="fit a linear probe on the tiles inside labelled regions")
    t.add_argument("pairs", nargs="+", metavar="STORE GEOJSON",
                   help="pairs of an embedding store and its labelled regions (QuPath GeoJSON "
                        "with a classification name per annotation, level-0 pixels)")
    t.add_argument("--out", required=True, help="classifier file (.npz)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=run_train)

    q = cmds.add_parser("predict", help="classify every tile of a slide with a trained probe")
    q.add_argument("store", help="embedding store of the slide")
    q.add_argument("--probe", required=True, help="classifier file made by `gpfm classify train`")
    q.add_argument("--out", required=True, help="predictions as QuPath GeoJSON tiles (.geojson)")
    q.add_argument("--map", help="also write the class map (.png over the thumbnail, or .tif)")
    q.set_defaults(func=run_predict)


def _training_tiles(pairs: list[str]):
    import numpy as np

    from napari_gpfm.analysis.classify import labels_from_rois
    from napari_gpfm.analysis.geojson import read_geojson
    from napari_gpfm.cli._common import open_store
    from napari_gpfm.errors import ParameterError

    if len(pairs) % 2:
        raise ParameterError("give STORE GEOJSON pairs: each store followed by its regions file")
    feats, labels, identity, annotated, sources = [], [], None, set(), []
    for store_path, geojson_path in zip(pairs[::2], pairs[1::2], strict=True):
        store = open_store(store_path)
        ident = (store.attrs["encoder_id"], store.attrs["weights_sha256"], store.attrs["tiling_id"])
        if identity is not None and ident != identity:
            raise ParameterError(
                f"{store_path} was embedded with another encoder or tiling than the first store; "
                "a classifier is trained on one encoder and tiling"
            )
        identity = ident
        rois = [(a.to_roi(), a.class_name) for a in read_geojson(geojson_path) if a.class_name]
        annotated.update(name for _, name in rois)
        if not rois:
            raise ParameterError(
                f"{geojson_path} has no annotation with a class name; classify the regions "
                "(QuPath: Set class) before training"
            )
        idx, lab = labels_from_rois(store.coords, store.tile_size_l0, rois)
        sources.append((rois, store.coords, store.tile_size_l0))
        if len(idx) == 0:
            raise ParameterError(
                f"the regions in {geojson_path} cover no embedded tile of {store_path}; "
                "draw them over tissue"
            )
        feats.append(store.features[idx])
        labels.extend(str(v) for v in lab)
    return np.concatenate(feats), labels, identity, annotated, sources


def run_train(args) -> int:
    from napari_gpfm.analysis.classify import LinearProbe, left_out_note

    features, labels, (encoder_id, _, tiling_id), annotated, sources = _training_tiles(args.pairs)
    names = sorted(set(labels))
    probe = LinearProbe(class_names=names, encoder_id=encoder_id, tiling_id=tiling_id)
    probe.fit(features, labels, seed=args.seed)
    out = probe.save(args.out)
    counts = ", ".join(f"{k}: {v}" for k, v in probe.train_counts.items())
    print(f"trained a {len(names)}-class probe on {len(labels)} tiles ({counts})")
    left_out = sorted(annotated - set(names))
    if left_out:
        print(left_out_note(left_out, sources))
    cv = probe.cv
    if cv is not None and cv.accuracy is not None:
        print(f"cross-validated accuracy {cv.accuracy:.3f}, balanced {cv.balanced_accuracy:.3f} "
              f"({cv.folds} folds)")
    elif cv is not None:
        print(f"no cross-validation: {cv.reason}")
    print(f"saved to {out}")
    return 0


def run_predict(args) -> int:
    from napari_gpfm.analysis import views
    from napari_gpfm.analysis.classify import LinearProbe
    from napari_gpfm.analysis.geojson import tiles_to_geojson, write_geojson
    from napari_gpfm.cli._common import check_map_path, open_store, slide_thumbnail, write_view

    if args.map:
        check_map_path(args.map, "--map")  # before the GeoJSON is written, not after
    store = open_store(args.store)
    probe = LinearProbe.load(args.probe, expected_encoder_id=store.attrs["encoder_id"],
                             expected_tiling_id=store.attrs["tiling_id"])
    view = views.probe_view(store, probe)
    proba = view.probabilities  # type: ignore[attr-defined]
    measurements = {f"p({name})": proba[:, i] for i, name in enumerate(probe.class_names)}
    fc = tiles_to_geojson(store.coords, store.tile_size_l0, measurements=measurements,
                          classes=view.values, class_names=probe.class_names,
                          colours=probe.colours)
    write_geojson(args.out, fc)
    print(f"classified {len(view.values)} tiles -> {args.out}")
    for row in view.table:
        print("  " + json.dumps(row, default=str))
    if args.map:
        thumb = slide_thumbnail(store) if args.map.lower().endswith(".png") else None
        write_view(view, args.map, thumbnail=thumb, flag="--map")
        print(f"class map -> {args.map}")
    return 0
