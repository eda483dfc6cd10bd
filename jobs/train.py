"""Train a distrnn config on a Ray cluster through Ray Train.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --num-workers 2 --max-failures 1 --config jobs/configs/default.yaml

Options are those of :class:`distrnn.raytrain.RayTrainArgs` (``--help``); every other argument
is passed to distrnn's own CLI, exactly as ``distrnn fit`` takes it.
"""

from distrnn.raytrain import main

if __name__ == "__main__":
    main()
