package wasmhost

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// oomScoreAdjFile is where a process sets its own OOM score adjustment.
const oomScoreAdjFile = "/proc/self/oom_score_adj"

// SetOOMScoreAdj gives the host the OOM score adjustment v, rather than the
// one it inherits from the daemon that started it. Raising a score is
// always allowed; lowering it needs CAP_SYS_RESOURCE: without it the host
// keeps the lowest score it may have, and says so.
func SetOOMScoreAdj(v int) error {
	return setOOMScoreAdj(oomScoreAdjFile, v)
}

func setOOMScoreAdj(file string, v int) error {
	if v < -1000 || v > 1000 {
		return fmt.Errorf("oom_score_adj %d is not within -1000 and 1000: %w", v, errdefs.ErrInvalidArgument)
	}
	err := os.WriteFile(file, []byte(strconv.Itoa(v)), 0)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EACCES) && !errors.Is(err, unix.EPERM) {
		return fmt.Errorf("setting oom_score_adj: %w", err)
	}
	b, rerr := os.ReadFile(file)
	if rerr != nil {
		return fmt.Errorf("setting oom_score_adj: %w", err)
	}
	cur, perr := strconv.Atoi(strings.TrimSpace(string(b)))
	if perr != nil || cur > v {
		// Refused to go lower: keep what we have, which is higher.
		log.L.WithError(err).WithField("oom_score_adj", strings.TrimSpace(string(b))).WithField("wanted", v).
			Warn("the wasm host may not lower its oom_score_adj (no CAP_SYS_RESOURCE); keeping it")
		return nil
	}
	return fmt.Errorf("setting oom_score_adj to %d (it is %d): %w", v, cur, err)
}
