from .. import compat as _compat

_compat.apply()  # before detectron2 / Mask2Former modules are imported
from . import capetown  # noqa: F401  registers capetown_sem_seg_{train,val,test}
