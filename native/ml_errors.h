/*
 * ml_errors.h - the status codes every function of meshlink's C core
 * returns, in one place.
 *
 * The vchan ring, the local and Xen providers, XenStore access and the blk
 * ring all report through these codes, and the Python side maps them to
 * exceptions (meshlink/_ring.py, meshlink/xenvchan.py) by name through cffi.
 * They live in their own header so that a file needing only the codes (the
 * blk ring, a fuzz target) does not pull in the vchan API, and so that cffi
 * reads the numbers from here: there is no second copy in Python.
 */
#ifndef MESHLINK_ML_ERRORS_H
#define MESHLINK_ML_ERRORS_H

/* cffi:begin -- from here to cffi:end this header is also read by cffi
 * (meshlink/_ffi_build.py), so it holds only declarations, integer
 * #defines and enums: no expressions, no includes. */

/* Status codes: >= 0 is success (often a byte count); errors are negative. */
enum ml_status {
    ML_OK = 0,
    ML_ECORRUPT = -2, /* the peer wrote impossible values into shared memory */
    ML_EINVAL = -3,   /* bad argument from our own caller */
    ML_ETOOBIG = -4,  /* packet larger than the ring */
    ML_ENOMEM = -5,
    ML_ESYS = -6,     /* a system call failed; errno is preserved */
    ML_ECLOSED = -7,  /* operation on a channel we closed ourselves */
    ML_ETIMEDOUT = -8, /* a wait with a timeout ran out */
    ML_ENOROOM = -9    /* no room for the whole message: nothing was written */
};

/* cffi:end */

#endif
