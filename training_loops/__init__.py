"""The same training run four ways: eager, tf.function, graph and model.fit.

    history = training_loops.train(model_fn, optimizer_fn, loss, dataset,
                                   loop="graph", epochs=5)
    # A compiled model whose class has its own train_step (a GAN):
    history = training_loops.train(gan_fn, train_data=images, loop="graph")
"""

from training_loops.atomic import (WriteError, make_directory,
                                   replaced_atomically,
                                   write_json_atomically, writing)
from training_loops.callback_state import CallbackState
from training_loops.callbacks import (BestModelCheckpoint, EarlyStopping,
                                      ProfileEpoch)
from training_loops.checkpoints import (CheckpointMismatchError,
                                        CheckpointNotSharedError,
                                        DamagedCheckpointError)
from training_loops.controller import Controller, RunOptions
from training_loops.drivers import Driver, LoopOptions, StepDriver
from training_loops.history import History
from training_loops.interrupts import TrainingInterrupted
from training_loops.keras_step import KerasStep
from training_loops.lockstep import Divergence, LockstepReport, compare
from training_loops.run_lock import RunLock, RunLockedError
from training_loops.strategies import (STRATEGIES, CollectiveMismatchError,
                                       PeerRefusedError, WorkerLostError,
                                       first_refusal, is_multi_worker,
                                       make_strategy)
from training_loops.step import TrainingStep
from training_loops.supervised_step import (NonFiniteLossError, Trainer,
                                    TrainingDataError)
from training_loops.training import (LOOPS, SupervisedOptions, build_driver,
                                     evaluate, train)

__all__ = ["BestModelCheckpoint", "build_driver", "CallbackState",
           "CheckpointMismatchError",
           "CheckpointNotSharedError", "CollectiveMismatchError", "compare",
           "DamagedCheckpointError",
           "Controller", "Divergence", "Driver", "EarlyStopping", "evaluate",
           "first_refusal", "is_multi_worker",
           "History", "KerasStep", "LockstepReport", "LoopOptions", "LOOPS",
           "make_directory", "make_strategy", "NonFiniteLossError",
           "PeerRefusedError", "ProfileEpoch",
           "replaced_atomically", "RunLock", "RunLockedError", "RunOptions",
           "StepDriver",
           "STRATEGIES", "SupervisedOptions", "train",
           "Trainer", "TrainingDataError", "TrainingInterrupted",
           "TrainingStep",
           "WorkerLostError", "WriteError", "write_json_atomically", "writing"]
