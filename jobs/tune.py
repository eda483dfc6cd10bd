"""A Ray Tune sweep over distrnn configs.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune.py --config jobs/configs/sweep_byte_lstm.yaml

Keys of the sweep YAML are those of :class:`distrnn.tune.SweepConfig`; any of them can be given
on the command line too (``--num_samples 8``). ``--resume true`` continues an interrupted sweep.
"""

from distrnn.tune import main

if __name__ == "__main__":
    main()
