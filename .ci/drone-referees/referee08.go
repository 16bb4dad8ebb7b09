// referee08: what Drone v0.8.10's server (server/hook.go PostHook + builder.Build)
// would compile for a push, a pull request and a tag, using its vendored
// cncd/pipeline frontend (yaml, matrix, linter, compiler) and drone/envsubst.
package main

import (
	"encoding/json"
	"fmt"
	"io/ioutil"
	"os"
	"strings"

	"github.com/cncd/pipeline/pipeline/backend"
	"github.com/cncd/pipeline/pipeline/frontend"
	"github.com/cncd/pipeline/pipeline/frontend/yaml"
	"github.com/cncd/pipeline/pipeline/frontend/yaml/compiler"
	"github.com/cncd/pipeline/pipeline/frontend/yaml/linter"
	"github.com/cncd/pipeline/pipeline/frontend/yaml/matrix"
	"github.com/drone/envsubst"
)

type stepOut struct {
	Name      string `json:"name"`
	OnSuccess bool   `json:"on_success"`
	OnFailure bool   `json:"on_failure"`
	Detached  bool   `json:"detached"`
	Image     string `json:"image"`
	Internal  string `json:"internal"`
}
type stageOut struct {
	Alias string    `json:"alias"`
	Steps []stepOut `json:"steps"`
}
type jobOut struct {
	Axis          map[string]string `json:"axis"`
	Stages        []stageOut        `json:"stages"`
	LintUntrusted string            `json:"lint_untrusted,omitempty"`
	LintTrusted   string            `json:"lint_trusted,omitempty"`
	Error         string            `json:"error,omitempty"`
}
type eventOut struct {
	Built  bool     `json:"built"`
	Reason string   `json:"reason,omitempty"`
	Error  string   `json:"error,omitempty"`
	Jobs   []jobOut `json:"jobs"`
}

func main() {
	raw, err := ioutil.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	repoName := os.Args[2]
	conf := string(raw)
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
		out[ev.event] = build(conf, repoName, ev.event, ev.ref, ev.branch)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", " ")
	enc.Encode(out)
}

func build(conf, repoName, event, ref, branch string) *eventOut {
	res := &eventOut{Built: true}
	// server/hook.go: the branches filter, read from the raw file
	branches, err := yaml.ParseString(conf)
	if err == nil {
		if !branches.Branches.Match(branch) && event != "tag" && event != "deployment" {
			res.Built = false
			res.Reason = "Branch does not match restrictions defined in yaml"
			return res
		}
	}
	// builder.Build
	axes, err := matrix.ParseString(conf)
	if err != nil {
		res.Error = "matrix: " + err.Error()
		return res
	}
	if len(axes) == 0 {
		axes = append(axes, matrix.Axis{})
	}
	link := "https://drone.example.com"
	for i, axis := range axes {
		job := jobOut{Axis: axis}
		metadata := frontend.Metadata{
			Repo: frontend.Repo{Name: repoName, Link: "https://github.com/" + repoName,
				Remote: "https://github.com/" + repoName + ".git", Branch: "master"},
			Curr: frontend.Build{Number: 2, Status: "pending", Event: event,
				Link:   "https://github.com/" + repoName + "/commit/0123456789abcdef0123456789abcdef01234567",
				Commit: frontend.Commit{Sha: "0123456789abcdef0123456789abcdef01234567", Ref: ref, Branch: branch, Message: "a change"}},
			Prev: frontend.Build{Number: 1, Status: "success", Event: "push",
				Commit: frontend.Commit{Sha: "fedcba9876543210fedcba9876543210fedcba98", Ref: "refs/heads/master", Branch: "master"}},
			Job: frontend.Job{Number: i + 1, Matrix: axis},
			Sys: frontend.System{Name: "drone", Link: link, Host: "drone.example.com", Arch: "linux/amd64"},
		}
		environ := metadata.Environ()
		for k, v := range metadata.EnvironDrone() {
			environ[k] = v
		}
		for k, v := range axis {
			environ[k] = v
		}
		s, err := envsubst.Eval(conf, func(name string) string {
			env := environ[name]
			if strings.Contains(env, "\n") {
				env = fmt.Sprintf("%q", env)
			}
			return env
		})
		if err != nil {
			res.Error = "envsubst: " + err.Error()
			return res
		}
		parsed, err := yaml.ParseString(s)
		if err != nil {
			res.Error = "yaml: " + err.Error()
			return res
		}
		metadata.Sys.Arch = parsed.Platform
		if metadata.Sys.Arch == "" {
			metadata.Sys.Arch = "linux/amd64"
		}
		if lerr := linter.New(linter.WithTrusted(false)).Lint(parsed); lerr != nil {
			job.LintUntrusted = lerr.Error()
		}
		if lerr := linter.New(linter.WithTrusted(true)).Lint(parsed); lerr != nil {
			job.LintTrusted = lerr.Error()
			job.Error = "linter (trusted repo): " + lerr.Error()
		}
		ir := compiler.New(
			compiler.WithEnviron(environ),
			compiler.WithLocal(false),
			compiler.WithPrefix(fmt.Sprintf("%d_%d", i+1, 1)),
			compiler.WithEnviron(axis),
			compiler.WithWorkspaceFromURL("/drone", "https://github.com/"+repoName),
			compiler.WithMetadata(metadata),
		).Compile(parsed)
		job.Stages = stages(ir)
		res.Jobs = append(res.Jobs, job)
	}
	return res
}

func stages(ir *backend.Config) []stageOut {
	var out []stageOut
	for _, st := range ir.Stages {
		so := stageOut{Alias: st.Alias, Steps: []stepOut{}}
		for _, step := range st.Steps {
			so.Steps = append(so.Steps, stepOut{Name: step.Alias, OnSuccess: step.OnSuccess,
				OnFailure: step.OnFailure, Detached: step.Detached, Image: step.Image, Internal: step.Name})
		}
		out = append(out, so)
	}
	return out
}
