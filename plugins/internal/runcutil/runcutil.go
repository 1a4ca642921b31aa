// Package runcutil is what the callers of the runc binary share, in the
// daemon (kuasar-runc) and in the kuasar-vmm guest agent: runc's messages
// as errdefs classes, and the last error of runc's JSON log. It stays
// small: the guest agent is a static binary in every VM's RAM.
package runcutil

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/containerd/errdefs"
)

// Failure gives runc's message the errdefs class it means: NotFound for a
// container or process that is not there (or no longer runs),
// FailedPrecondition for a command the container's root file system does
// not have; err (runc's exit) when there is no message.
func Failure(msg string, err error) error {
	msg = strings.TrimSpace(msg)
	if msg == "" {
		return err
	}
	lower := strings.ToLower(msg)
	switch {
	case strings.Contains(lower, "does not exist"), strings.Contains(lower, "not found"),
		strings.Contains(lower, "not running"), strings.Contains(lower, "no such process"),
		strings.Contains(lower, "process already finished"):
		if strings.Contains(lower, "executable file not found") {
			return fmt.Errorf("%s: %w", msg, errdefs.ErrFailedPrecondition)
		}
		return fmt.Errorf("%s: %w", msg, errdefs.ErrNotFound)
	case strings.Contains(lower, "unable to start container process") && strings.Contains(lower, "no such file or directory"):
		return fmt.Errorf("%s: %w", msg, errdefs.ErrFailedPrecondition)
	}
	return errors.New(msg)
}

// LogError returns the last error of a runc JSON log (--log-format json),
// "" if there is none or no log.
func LogError(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	var last string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var e struct {
			Level string `json:"level"`
			Msg   string `json:"msg"`
		}
		if json.Unmarshal(sc.Bytes(), &e) == nil && (e.Level == "error" || e.Level == "fatal") {
			last = e.Msg
		}
	}
	return last
}

// ParsePs decodes the output of `runc ps --format json`: the pids of a
// container's processes.
func ParsePs(out []byte) ([]int, error) {
	var pids []int
	if err := json.Unmarshal(out, &pids); err != nil {
		return nil, fmt.Errorf("decoding runc ps: %w", err)
	}
	return pids, nil
}
