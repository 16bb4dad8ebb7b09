// referee04: what Drone 0.4 would run for a push, a pull request and a tag.
// Server side: drone v0.4.2 web/hook.go (yaml.ParseMatrix, yaml.ParseBranch)
// and engine (DefaultBuildArgs / DefaultPullRequestArgs: no --deploy for a
// pull request; notify once per build after every job). Job side: drone-exec
// (exec.Exec: inject, parser.Parse with its rules, runner walk and isMatch).
package main

import (
	"fmt"
	"path"
	"encoding/json"
	"io/ioutil"
	"os"
	"strings"

	droneyaml "github.com/drone/drone/yaml"
	"github.com/drone/drone-exec/parser"
	"github.com/drone/drone-exec/yaml"
	"github.com/drone/drone-exec/yaml/inject"
	yamlv2 "gopkg.in/yaml.v2"
)

type stepOut struct {
	Name      string `json:"name"`
	Section   string `json:"section"`
	Image     string `json:"image"`
	OnSuccess bool   `json:"on_success"`
	OnFailure bool   `json:"on_failure"`
}
type jobOut struct {
	Axis  map[string]string `json:"axis"`
	Steps []stepOut         `json:"steps"`
	Error string            `json:"error,omitempty"`
}
type eventOut struct {
	Built  bool      `json:"built"`
	Reason string    `json:"reason,omitempty"`
	Error  string    `json:"error,omitempty"`
	Jobs   []jobOut  `json:"jobs"`
	Notify []stepOut `json:"notify"` // once per build, with the last job's matrix
}

func main() {
	raw, err := ioutil.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	out := map[string]*eventOut{}
	// os.Args[3], [4]: the branch a pull request and a tag build get (the remote decides)
	prBranch, tagBranch := "master", "master"
	if len(os.Args) > 4 {
		prBranch, tagBranch = os.Args[3], os.Args[4]
	}
	for _, ev := range []struct{ event, ref, branch string }{
		{"push", "refs/heads/master", "master"},
		{"pull_request", "refs/pull/1/head", prBranch},
		{"tag", "refs/tags/v1.0.0", tagBranch},
	} {
		out[ev.event] = build(raw, os.Args[2], ev.event, ev.ref, ev.branch)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", " ")
	enc.Encode(out)
}

// build step names: one unnamed step ("build") or a map of named steps
func buildNames(y string) []string {
	doc := yamlv2.MapSlice{}
	yamlv2.Unmarshal([]byte(y), &doc)
	for _, item := range doc {
		if k, _ := item.Key.(string); k == "build" {
			if ms, ok := item.Value.(yamlv2.MapSlice); ok {
				for _, sub := range ms {
					if k2, _ := sub.Key.(string); k2 == "image" {
						if v, _ := sub.Value.(string); v != "" {
							return []string{"build"}
						}
					}
				}
				var out []string
				for _, sub := range ms {
					s, _ := sub.Key.(string)
					out = append(out, s)
				}
				return out
			}
		}
	}
	return nil
}

// section names in file order (the parse tree keeps only images)
func names(y string, section string) []string {
	doc := yamlv2.MapSlice{}
	yamlv2.Unmarshal([]byte(y), &doc)
	for _, item := range doc {
		if k, _ := item.Key.(string); k == section {
			if ms, ok := item.Value.(yamlv2.MapSlice); ok {
				var out []string
				for _, sub := range ms {
					s, _ := sub.Key.(string)
					out = append(out, s)
				}
				return out
			}
		}
	}
	return nil
}

func build(raw []byte, repoName, event, ref, branch string) *eventOut {
	res := &eventOut{Built: true, Jobs: []jobOut{}}
	axes, err := droneyaml.ParseMatrix(raw)
	if err != nil {
		res.Error = "matrix: " + err.Error()
		return res
	}
	if len(axes) == 0 {
		axes = append(axes, droneyaml.Axis{})
	}
	branches := droneyaml.ParseBranch(raw)
	if !branches.Matches(branch) && event != "tag" && event != "deployment" {
		res.Built = false
		res.Reason = "Branch does not match restrictions defined in yaml"
		return res
	}
	for i, axis := range axes {
		job := jobOut{Axis: axis, Steps: []stepOut{}}
		y := string(raw)
		params := map[string]string{
			"COMMIT_SHORT": "0123456789abcdef0123456789abcdef01234567",
			"COMMIT":       "0123456789abcdef0123456789abcdef01234567",
			"BRANCH":       branch,
			"BUILD_NUMBER": "2",
		}
		if event == "tag" {
			params["TAG"] = strings.TrimPrefix(ref, "refs/tags/")
		}
		y = inject.Inject(y, axis)
		y = inject.Inject(y, params)
		rules := []parser.RuleFunc{
			parser.ImageName,
			parser.ImageMatchFunc([]string{""}), // PLUGIN_FILTER unset: plugins/*
			parser.ImagePullFunc(false),
			parser.SanitizeFunc(false),
			parser.CacheFunc(repoName),
			parser.DebugFunc(yaml.ParseDebugString(y)),
			parser.StorageDriverFunc("overlay"),
			parser.Escalate,
			parser.HttpProxy,
			parser.DefaultNotifyFilter,
		}
		tree, err := parser.Parse(y, rules)
		if err != nil {
			job.Error = err.Error()
			res.Jobs = append(res.Jobs, job)
			continue
		}
		// name the nodes: Load appends cache, clone, compose..., build, publish..., deploy..., notify...
		sec := map[parser.NodeType][]string{
			parser.NodeBuild:   buildNames(y),
			parser.NodeCompose: names(y, "compose"),
			parser.NodePublish: names(y, "publish"),
			parser.NodeDeploy:  names(y, "deploy"),
			parser.NodeNotify:  names(y, "notify"),
		}
		idx := map[parser.NodeType]int{}
		secname := map[parser.NodeType]string{parser.NodeCache: "cache", parser.NodeClone: "clone",
			parser.NodeCompose: "compose", parser.NodeBuild: "build", parser.NodePublish: "publish",
			parser.NodeDeploy: "deploy", parser.NodeNotify: "notify"}
		var notify []stepOut
		for _, n := range tree.Root.Nodes {
			var filter *parser.FilterNode
			var d *parser.DockerNode
			switch n := n.(type) {
			case *parser.FilterNode:
				filter = n
				d, _ = n.Node.(*parser.DockerNode)
			case *parser.DockerNode:
				d = n
			}
			if d == nil {
				continue
			}
			t := d.NodeType
			name := secname[t]
			if list, ok := sec[t]; ok {
				if idx[t] < len(list) {
					name = list[idx[t]]
				}
				idx[t]++
			}
			if t == parser.NodeCache || t == parser.NodeClone {
				continue // run by the job, not listed
			}
			if len(d.Image) == 0 {
				continue // runner: a node with no image is skipped (e.g. no build section)
			}
			so := stepOut{Name: name, Section: secname[t], Image: d.Image}
			// status while running: "running" (success path); notify sees the final job status
			match := func(status string) bool {
				if filter == nil {
					return true
				}
				return isMatch(filter, repoName, event, branch, "", status, axis, "success")
			}
			switch t {
			case parser.NodeCompose:
				so.OnSuccess, so.OnFailure = true, false
			case parser.NodeBuild:
				// runner/build.go: a build step returns at once if the job has failed
				so.OnSuccess, so.OnFailure = match("running"), false
			case parser.NodePublish, parser.NodeDeploy:
				// exec.Exec: only with --deploy (never for a pull request) and only if not failed
				so.OnSuccess = event != "pull_request" && match("running")
				so.OnFailure = false
			case parser.NodeNotify:
				so.OnSuccess = match("success")
				so.OnFailure = match("failure")
				notify = append(notify, so)
				continue
			}
			job.Steps = append(job.Steps, so)
		}
		res.Jobs = append(res.Jobs, job)
		if i == len(axes)-1 {
			res.Notify = notify
		}
	}
	return res
}

// ---- from drone-exec 820b2c9 runner/match.go (plugin.StateSuccess/StateRunning inlined,
// the State fields passed as arguments) ----
const stateSuccess, stateRunning = "success", "running"

func isMatch(node *parser.FilterNode, repo, event, branch, deploy, status string, matrix map[string]string, last string) (match bool) {
	switch {
	case !matchBranch(node.Branch, branch):
		return false
	case !matchMatrix(node.Matrix, matrix):
		return false
	case !matchRepo(node.Repo, repo):
		return false
	case !matchEvent(node.Event, event):
		return false
	case !matchEnvironment(node.Environment, deploy):
		return false
	}
	switch {
	case matchSuccess(node.Success, status):
		return true
	case matchFailure(node.Failure, status):
		return true
	case matchChange(node.Change, status, last):
		return true
	}
	return false
}

// matchBranch is a helper function that returns true
// if all_branches is true. Else it returns false if a
// branch condition is specified, and the branch does
// not match.
func matchBranch(want []string, got string) (match bool) {
	if len(want) == 0 {
		return true
	}
	if strings.HasPrefix(got, "refs/heads/") {
		got = got[11:]
	}
	for _, pattern := range want {
		if matchPath(pattern, got) {
			match = true
			break
		}
	}
	return
}

// matchRepo is a helper function that returns false
// if this task is only intended for a named repo,
// the current build does not match that repo.
//
// This is useful when you want to prevent forks from
// executing deployment, publish or notification steps.
func matchRepo(want, got string) bool {
	if len(want) == 0 {
		return true
	}
	return got == want
}

// matchEvent is a helper function that returns false
// if this task is only intended for a specific repository
// event not matched by the current build. For example,
// only executing a build for `tags` or `pull_requests`
func matchEvent(want []string, got string) (match bool) {
	if len(want) == 0 {
		return true
	}
	for _, want_ := range want {
		if got == want_ {
			match = true
			break
		}
	}
	return
}

// matchMatrix is a helper function that returns false
// to limit steps to only certain matrix axis.
func matchMatrix(want, got map[string]string) bool {
	if len(want) == 0 {
		return true
	}
	for k, v := range want {
		if got[k] != v {
			return false
		}
	}
	return true
}

func matchSuccess(toggle, status string) bool {
	ok, err := parseBool(toggle)
	if err != nil {
		return true
	}
	return ok && (status == stateSuccess || status == stateRunning)
}

func matchFailure(toggle, status string) bool {
	ok, err := parseBool(toggle)
	if err != nil {
		return true
	}
	return ok && status != stateSuccess && status != stateRunning
}

func matchChange(toggle, status, last string) bool {
	ok, err := parseBool(toggle)
	if err != nil {
		return true
	}
	switch status {
	case stateRunning:
		status = stateSuccess
	}
	return ok && status != last
}

func matchEnvironment(want []string, got string) (match bool) {
	if len(want) == 0 {
		return true
	}
	for _, want_ := range want {
		if got == want_ {
			match = true
			break
		}
	}
	return
}

func parseBool(str string) (value bool, err error) {
	switch str {
	case "true", "TRUE", "True", "On", "ON", "on":
		return true, nil
	case "false", "FALSE", "False", "Off", "off", "OFF":
		return false, nil
	}
	return false, fmt.Errorf("Error parsing boolean %s", str)
}

func matchPath(pattern, str string) bool {
	negate := strings.HasPrefix(pattern, "!")
	if negate {
		pattern = pattern[1:]
	}
	match, _ := path.Match(pattern, str)
	if negate {
		match = !match
	}
	return match
}
