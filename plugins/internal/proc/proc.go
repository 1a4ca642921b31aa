// Package proc reads process facts from /proc and signals processes safely
// (through pidfds, checking the process start time so that a recycled pid
// is never signalled by mistake).
package proc

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Stat holds the fields of /proc/PID/stat used here.
type Stat struct {
	State     byte
	PPid      int
	StartTime uint64 // clock ticks since boot
}

// ReadStat parses /proc/PID/stat.
func ReadStat(pid int) (Stat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return Stat{}, err
	}
	return parseStat(b)
}

func parseStat(b []byte) (Stat, error) {
	// The command name is in parentheses and may contain anything.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return Stat{}, errors.New("malformed stat")
	}
	fields := strings.Fields(string(b[i+2:]))
	// fields[0] is state (field 3); starttime is field 22.
	if len(fields) < 20 {
		return Stat{}, errors.New("short stat")
	}
	ppid, err := strconv.Atoi(fields[1])
	if err != nil {
		return Stat{}, fmt.Errorf("stat ppid: %w", err)
	}
	start, err := strconv.ParseUint(fields[19], 10, 64)
	if err != nil {
		return Stat{}, fmt.Errorf("stat starttime: %w", err)
	}
	return Stat{State: fields[0][0], PPid: ppid, StartTime: start}, nil
}

// StartTime returns the start time of pid (0 if it cannot be read).
func StartTime(pid int) uint64 {
	st, err := ReadStat(pid)
	if err != nil {
		return 0
	}
	return st.StartTime
}

// Alive reports whether pid exists (zombies included) and, if start is not
// zero, is the process that started then.
func Alive(pid int, start uint64) bool {
	if pid <= 0 {
		return false
	}
	st, err := ReadStat(pid)
	if err != nil {
		return false
	}
	return start == 0 || st.StartTime == start
}

// OpenPidfd returns a pidfd for pid if it is the process started at start
// (0 skips the check).
func OpenPidfd(pid int, start uint64) (int, error) {
	if pid <= 0 {
		return -1, fmt.Errorf("invalid pid %d", pid)
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return -1, err
	}
	// Checked after opening: the pidfd now pins the process we compare.
	if start != 0 {
		if st, err := ReadStat(pid); err != nil || st.StartTime != start {
			unix.Close(fd)
			return -1, unix.ESRCH
		}
	}
	return fd, nil
}

// Signal sends sig to pid if it is still the process started at start.
// It returns an error wrapping unix.ESRCH when that process is gone.
func Signal(pid int, start uint64, sig unix.Signal) error {
	fd, err := OpenPidfd(pid, start)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.PidfdSendSignal(fd, sig, nil, 0)
}

// WaitPidfd blocks until pid exits (it need not be a child).
func WaitPidfd(pid int) error {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil
		}
		return err
	}
	defer unix.Close(fd)
	for {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		_, err := unix.Poll(fds, -1)
		if err == unix.EINTR {
			continue
		}
		return err
	}
}

// Children counts the live (not zombie) processes whose parent is pid, by
// reading every /proc/PID/stat: a scan of the node's processes.
func Children(pid int) int { return len(ChildPids(pid, false)) }

// ChildPids lists the processes whose parent is pid, zombies too if asked,
// by reading every /proc/PID/stat.
func ChildPids(pid int, zombies bool) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, err := ReadStat(p); err == nil && st.PPid == pid && (zombies || st.State != 'Z') {
			out = append(out, p)
		}
	}
	return out
}
