from . import capetown  # noqa: F401  registers capetown_sem_seg_{train,val,test}
