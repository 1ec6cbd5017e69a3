//! The twelve problem families, each a GSM8K-style story with its steps.

use super::{calc, cap, Draft, Gen, Op};

/// "Natalia sold 48 clips in April and half as many in May": a fraction or a
/// multiple of a first amount, then a sum; sometimes a third period (4 steps).
pub(super) fn fam_fraction(g: &mut Gen) -> Draft {
    let p = g.person();
    let (item, past, base) = g.pick(&[
        ("clips", "sold", "sell"),
        ("cupcakes", "baked", "bake"),
        ("cookies", "baked", "bake"),
        ("bracelets", "made", "make"),
        ("scarves", "knitted", "knit"),
        ("birdhouses", "built", "build"),
        ("apples", "picked", "pick"),
    ]);
    let (prep, t1, t2, t3) = g.pick(&[
        ("in", "April", "May", "June"),
        ("on", "Monday", "Tuesday", "Wednesday"),
        ("in", "the morning", "the afternoon", "the evening"),
        ("in", "the first week", "the second week", "the third week"),
    ]);
    let (rel, op, k) = g.pick(&[
        ("half", Op::Div, 2),
        ("a third", Op::Div, 3),
        ("a quarter", Op::Div, 4),
        ("twice", Op::Mul, 2),
        ("three times", Op::Mul, 3),
    ]);
    let a = if matches!(op, Op::Div) {
        k * g.int(4, 25)
    } else {
        g.int(3, 30)
    };
    let (b, eb) = calc(a, op, k, false);
    let (who, she) = (p.name, p.she);
    let mut prompt = format!(
        "{who} {past} {a} {item} {prep} {t1}, \
         and then {she} {past} {rel} as many {item} {prep} {t2}."
    );
    let mut steps = vec![format!("{who} {past} {eb} {item} {prep} {t2}")];
    let (s, es) = calc(a, Op::Add, b, false);
    let answer = if g.chance(0.4) {
        let e = g.int(2, 15);
        prompt += &format!(
            " {} {t3}, {she} {past} {e} more {item} than {prep} {t2}.",
            cap(prep)
        );
        prompt += &format!(" How many {item} did {who} {base} in total?");
        let (c, ec) = calc(b, Op::Add, e, false);
        let (t, et) = calc(s, Op::Add, c, false);
        steps.push(format!("{prep} {t3}, {she} {past} {ec} {item}"));
        steps.push(format!("{prep} {t1} and {t2}, {she} {past} {es} {item}"));
        steps.push(format!("in total, {she} {past} {et} {item}"));
        t
    } else {
        prompt += &format!(" How many {item} did {who} {base} altogether {prep} {t1} and {t2}?");
        steps.push(format!(
            "{who} {past} {es} {item} altogether {prep} {t1} and {t2}"
        ));
        s
    };
    Draft {
        prompt,
        first: format!("how many {item} {who} {past} {prep} {t2}"),
        steps,
        conclusion: format!("{who} {past} {answer} {item} in total"),
        answer,
    }
}

/// Shopping with a bill: item costs, a total, then the change (2 or 4 steps).
pub(super) fn fam_change(g: &mut Gen) -> Draft {
    let p = g.person();
    const GOODS: [(&str, i64, i64); 8] = [
        ("notebooks", 2, 6),
        ("pens", 1, 4),
        ("sandwiches", 4, 9),
        ("movie tickets", 8, 15),
        ("T-shirts", 7, 15),
        ("plants", 3, 12),
        ("books", 5, 14),
        ("bags of chips", 1, 3),
    ];
    let (g1, lo1, hi1) = g.pick(&GOODS);
    let (n1, p1) = (g.int(2, 6), g.int(lo1, hi1));
    let (who, she) = (p.name, p.she);
    let (c1, e1) = calc(p1, Op::Mul, n1, true);
    let mut steps = vec![format!("the {g1} cost {e1}")];
    let mut buys = format!("{n1} {g1} for ${p1} each");
    let mut total = c1;
    if g.chance(0.5) {
        let (g2, lo2, hi2) = g.pick(&GOODS);
        let g2 = if g2 == g1 { "erasers" } else { g2 };
        let (n2, p2) = (g.int(2, 6), g.int(lo2, hi2));
        let (c2, e2) = calc(p2, Op::Mul, n2, true);
        let (t, et) = calc(c1, Op::Add, c2, true);
        buys += &format!(" and {n2} {g2} for ${p2} each");
        steps.push(format!("the {g2} cost {e2}"));
        steps.push(format!("altogether, {who} spends {et}"));
        total = t;
    }
    let bill = [20, 50, 100, 200]
        .into_iter()
        .find(|&b| b > total)
        .unwrap_or(500);
    let (change, ec) = calc(bill, Op::Sub, total, true);
    steps.push(format!("{who}'s change is {ec}"));
    let prompt = if g.chance(0.5) {
        format!(
            "{who} buys {buys}. {} pays with a ${bill} bill. How much change does {she} get?",
            cap(she)
        )
    } else {
        format!(
            "{who} went to the store and bought {buys}. \
             If {she} paid with a ${bill} bill, how much change did {she} receive?"
        )
    };
    Draft {
        prompt,
        first: format!("how much the {g1} cost"),
        steps,
        conclusion: format!("{who}'s change is ${change}"),
        answer: change,
    }
}

/// Hourly pay: a day's or a week's earnings, plus a tip or minus spending.
pub(super) fn fam_wage(g: &mut Gen) -> Draft {
    let p = g.person();
    let job = g.pick(&[
        "babysitting",
        "tutoring",
        "walking dogs",
        "mowing lawns",
        "washing cars",
    ]);
    let (who, she, she_c) = (p.name, p.she, cap(p.she));
    let (r, h) = (g.int(8, 25), g.int(2, 8));
    let (e, ee) = calc(r, Op::Mul, h, true);
    let head = format!("{who} earns ${r} an hour for {job}.");
    if g.chance(0.4) {
        let t = g.int(3, 20);
        let (total, et) = calc(e, Op::Add, t, true);
        return Draft {
            prompt: format!(
                "{head} Yesterday, {she} worked {h} hours and also got a ${t} tip. \
                 How much money did {she} earn yesterday?"
            ),
            first: format!("how much {who} earned from {job}"),
            steps: vec![
                format!("{who} earned {ee} from {job}"),
                format!("with the tip, {she} earned {et}"),
            ],
            conclusion: format!("{who} earned ${total} yesterday"),
            answer: total,
        };
    }
    let d = g.int(2, 6);
    let (w, ew) = calc(e, Op::Mul, d, true);
    let mut prompt = format!("{head} {she_c} works {h} hours a day, {d} days a week.");
    let mut steps = vec![
        format!("each day, {she} earns {ee}"),
        format!("in a week, {she} earns {ew}"),
    ];
    let (answer, conclusion) = if g.chance(0.5) {
        let thing = g.pick(&[
            "a new bike",
            "a video game",
            "a concert ticket",
            "a pair of shoes",
        ]);
        let x = g.int(1, (w - 1) / 5) * 5;
        let (left, el) = calc(w, Op::Sub, x, true);
        prompt += &format!(
            " At the end of the week, {she} spends ${x} on {thing}. \
             How much money does {she} have left?"
        );
        steps.push(format!("after buying {thing}, {she} has {el} left"));
        (left, format!("{who} has ${left} left"))
    } else {
        prompt += &format!(" How much does {she} earn in a week?");
        (w, format!("{who} earns ${w} in a week"))
    };
    Draft {
        prompt,
        first: format!("how much {who} earns each day"),
        steps,
        conclusion,
        answer,
    }
}

/// A percentage discount, computed GSM8K-style as 10% then a multiple of it.
pub(super) fn fam_discount(g: &mut Gen) -> Draft {
    let (one, many) = g.pick(&[
        ("jacket", "jackets"),
        ("bike", "bikes"),
        ("lamp", "lamps"),
        ("backpack", "backpacks"),
        ("video game", "video games"),
        ("chair", "chairs"),
        ("guitar", "guitars"),
        ("pair of shoes", "pairs of shoes"),
    ]);
    let (price, m) = (10 * g.int(2, 30), g.int(1, 5));
    let pct = 10 * m;
    let (tenth, et) = calc(price, Op::Div, 10, true);
    let mut steps = vec![format!("10% of ${price} is {et}")];
    let discount = if m > 1 {
        let (d, ed) = calc(tenth, Op::Mul, m, true);
        steps.push(format!("{pct}% of ${price} is {ed}"));
        d
    } else {
        tenth
    };
    let (sale, es) = calc(price, Op::Sub, discount, true);
    steps.push(format!("the sale price of the {one} is {es}"));
    let head = format!("A {one} costs ${price}. The store is having a sale with {pct}% off.");
    let first = format!("how much the {pct}% discount is");
    if g.chance(0.5) {
        return Draft {
            prompt: format!("{head} How much does the {one} cost during the sale?"),
            first,
            steps,
            conclusion: format!("the {one} costs ${sale} during the sale"),
            answer: sale,
        };
    }
    let p = g.person();
    let n = g.int(2, 4);
    let (total, en) = calc(sale, Op::Mul, n, true);
    steps.push(format!("for {n} {many}, {} pays {en}", p.name));
    Draft {
        prompt: format!(
            "{head} {} buys {n} {many}. How much does {} pay?",
            p.name, p.she
        ),
        first,
        steps,
        conclusion: format!("{} pays ${total} for {n} {many}", p.name),
        answer: total,
    }
}

/// Work remaining divided by a daily rate: how many more days.
pub(super) fn fam_progress(g: &mut Gen) -> Draft {
    let p = g.person();
    let (thing, unit, past, base) = g.pick(&[
        ("book", "pages", "read", "read"),
        ("puzzle", "pieces", "placed", "place"),
        ("scarf", "rows", "knitted", "knit"),
        ("wall", "bricks", "laid", "lay"),
    ]);
    let (r, days, done) = (g.int(5, 30), g.int(2, 12), g.int(10, 80));
    let total = done + r * days;
    let (who, she) = (p.name, p.she);
    let prompt = format!(
        "{who} is working on a {total}-{} {thing}. {} has already {past} {done} {unit}. \
         If {she} {base}s {r} {unit} a day, \
         how many more days will it take {} to finish the {thing}?",
        unit.trim_end_matches('s'),
        cap(she),
        p.her
    );
    let (rem, er) = calc(total, Op::Sub, done, false);
    let (d, ed) = calc(rem, Op::Div, r, false);
    Draft {
        prompt,
        first: format!("how many {unit} {who} still has to {base}"),
        steps: vec![
            format!("{who} still has {er} {unit} left to {base}"),
            format!("it will take {} {ed} days to finish the {thing}", p.her),
        ],
        conclusion: format!("{who} needs {d} more days"),
        answer: d,
    }
}

/// Two legs of a trip at different speeds; sometimes the distance still to go.
pub(super) fn fam_distance(g: &mut Gen) -> Draft {
    let p = g.person();
    let (verb, speed, unit, lo, hi) = g.pick(&[
        ("drives", "miles per hour", "miles", 30, 70),
        ("cycles", "kilometers per hour", "kilometers", 10, 25),
        ("walks", "miles per hour", "miles", 2, 4),
    ]);
    let (s1, h1, s2, h2) = (g.int(lo, hi), g.int(2, 5), g.int(lo, hi), g.int(2, 4));
    let (who, she) = (p.name, p.she);
    let (d1, e1) = calc(s1, Op::Mul, h1, false);
    let (d2, e2) = calc(s2, Op::Mul, h2, false);
    let (t, et) = calc(d1, Op::Add, d2, false);
    let mut prompt = format!(
        "{who} {verb} at {s1} {speed} for {h1} hours. \
         Then {she} {verb} at {s2} {speed} for {h2} hours."
    );
    let mut steps = vec![
        format!("in the first part, {she} {verb} {e1} {unit}"),
        format!("in the second part, {she} {verb} {e2} {unit}"),
        format!("in total, {she} {verb} {et} {unit}"),
    ];
    let (answer, conclusion) = if g.chance(0.35) {
        let goal = t + g.int(5, 60);
        let (left, el) = calc(goal, Op::Sub, t, false);
        prompt += &format!(
            " The whole trip is {goal} {unit}. How many {unit} does {she} still have to go?"
        );
        steps.push(format!("{she} still has {el} {unit} to go"));
        (left, format!("{who} still has {left} {unit} to go"))
    } else {
        prompt += &format!(" How many {unit} does {she} travel in total?");
        (t, format!("{who} travels {t} {unit} in total"))
    };
    Draft {
        prompt,
        first: format!("how far {who} goes in the first part"),
        steps,
        conclusion,
        answer,
    }
}

/// Give some away, then share the rest equally (2 or 3 steps).
pub(super) fn fam_share(g: &mut Gen) -> Draft {
    let p = g.person();
    let item = g.pick(&[
        "marbles",
        "stickers",
        "candies",
        "cards",
        "seashells",
        "oranges",
    ]);
    let rel = g.pick(&["brother", "sister", "cousin", "teacher"]);
    let (each, k, gave) = (g.int(2, 12), g.int(2, 6), g.int(1, 20));
    let ate = if g.chance(0.4) { g.int(1, 9) } else { 0 };
    let n = each * k + gave + ate;
    let (who, she, his) = (p.name, p.she, p.his);
    let (r, er) = calc(n, Op::Sub, gave, false);
    let mut steps = vec![format!(
        "after giving {gave} to {his} {rel}, {who} has {er} {item} left"
    )];
    let mut prompt = format!(
        "{who} has {n} {item}. {} gives {gave} of them to {his} {rel}",
        cap(she)
    );
    let rest = if ate > 0 {
        let verb = if item == "candies" || item == "oranges" {
            "eats"
        } else {
            "loses"
        };
        prompt += &format!(" and {verb} {ate}");
        let (r2, e2) = calc(r, Op::Sub, ate, false);
        steps.push(format!("after that, {she} has {e2} {item}"));
        r2
    } else {
        r
    };
    prompt += &format!(
        ". {} shares the rest equally among {k} friends. How many {item} does each friend get?",
        cap(she)
    );
    let (e, ee) = calc(rest, Op::Div, k, false);
    steps.push(format!("each friend gets {ee} {item}"));
    Draft {
        prompt,
        first: format!("how many {item} {who} has left"),
        steps,
        conclusion: format!("each friend gets {e} {item}"),
        answer: e,
    }
}

/// Weekly savings, an optional gift, then a purchase.
pub(super) fn fam_savings(g: &mut Gen) -> Draft {
    let p = g.person();
    let thing = g.pick(&["bike", "tablet", "skateboard", "watch", "telescope"]);
    let (s, w) = (g.int(5, 25), g.int(3, 12));
    let (who, she) = (p.name, p.she);
    let (t, et) = calc(s, Op::Mul, w, true);
    let mut prompt = format!("{who} saves ${s} every week for {w} weeks.");
    let mut steps = vec![format!("{who} saves {et} in {w} weeks")];
    let mut have = t;
    if g.chance(0.4) {
        let y = g.int(2, 10) * 5;
        let giver = g.pick(&["grandmother", "uncle", "aunt", "grandfather"]);
        let (t2, e2) = calc(t, Op::Add, y, true);
        prompt += &format!(" {} {giver} also gives {} ${y}.", cap(p.his), p.her);
        steps.push(format!("with the gift, {she} has {e2}"));
        have = t2;
    }
    let x = g.int(1, have - 1);
    let (left, el) = calc(have, Op::Sub, x, true);
    prompt += &format!(" Then {she} buys a {thing} for ${x}. How much money does {she} have left?");
    steps.push(format!("after buying the {thing}, {she} has {el} left"));
    Draft {
        prompt,
        first: format!("how much money {who} saves"),
        steps,
        conclusion: format!("{who} has ${left} left"),
        answer: left,
    }
}

/// Boxes times items per box, minus what is used, sometimes split into bags.
pub(super) fn fam_boxes(g: &mut Gen) -> Draft {
    let p = g.person();
    let (item, purpose) = g.pick(&[
        ("crayons", "make a poster"),
        ("eggs", "bake cakes"),
        ("beads", "make necklaces"),
        ("stickers", "decorate notebooks"),
        ("balloons", "decorate the hall"),
    ]);
    let (b, per) = (g.int(2, 9), g.int(6, 24));
    let (total, et) = calc(b, Op::Mul, per, false);
    let mut steps = vec![format!("there are {et} {item} in total")];
    let head = format!("There are {b} boxes of {item} with {per} {item} in each box.");
    let who = p.name;
    if g.chance(0.5) {
        let k = g.int(2, 4);
        let each = g.int(1, (total - 1) / k);
        let used = total - k * each;
        let (left, el) = calc(total, Op::Sub, used, false);
        let (e, ee) = calc(left, Op::Div, k, false);
        steps.push(format!("after using {used}, there are {el} {item} left"));
        steps.push(format!("each bag has {ee} {item}"));
        return Draft {
            prompt: format!(
                "{head} {who} uses {used} {item} to {purpose} and puts the rest into {k} bags \
                 with the same number in each bag. How many {item} are in each bag?"
            ),
            first: format!("how many {item} there are in total"),
            steps,
            conclusion: format!("each bag has {e} {item}"),
            answer: e,
        };
    }
    let used = g.int(1, total - 1);
    let (left, el) = calc(total, Op::Sub, used, false);
    steps.push(format!("after using {used}, there are {el} {item} left"));
    Draft {
        prompt: format!("{head} {who} uses {used} {item} to {purpose}. How many {item} are left?"),
        first: format!("how many {item} there are in total"),
        steps,
        conclusion: format!("there are {left} {item} left"),
        answer: left,
    }
}

/// A multiple of an age, years later; sometimes the sum of both ages.
pub(super) fn fam_ages(g: &mut Gen) -> Draft {
    let p = g.person();
    let rel = g.pick(&["aunt", "uncle", "father", "mother", "cousin"]);
    let (a, k, y) = (g.int(4, 15), g.int(2, 4), g.int(2, 10));
    let (who, his, his_c) = (p.name, p.his, cap(p.his));
    let times = ["", "", "twice", "three times", "four times"][k as usize];
    let (f, ef) = calc(a, Op::Mul, k, false);
    let (fy, efy) = calc(f, Op::Add, y, false);
    let head = format!(
        "{who} is {a} years old. {his_c} {rel} is {times} as old as {}.",
        p.her
    );
    let mut steps = vec![
        format!("{who}'s {rel} is {ef} years old"),
        format!("in {y} years, {his} {rel} will be {efy} years old"),
    ];
    if g.chance(0.4) {
        let (ay, eay) = calc(a, Op::Add, y, false);
        let (s, es) = calc(fy, Op::Add, ay, false);
        steps.push(format!("in {y} years, {who} will be {eay} years old"));
        steps.push(format!("the sum of their ages will be {es} years"));
        return Draft {
            prompt: format!("{head} What will be the sum of their ages in {y} years?"),
            first: format!("how old {who}'s {rel} is now"),
            steps,
            conclusion: format!("the sum of their ages in {y} years will be {s}"),
            answer: s,
        };
    }
    Draft {
        prompt: format!("{head} How old will {his} {rel} be in {y} years?"),
        first: format!("how old {who}'s {rel} is now"),
        steps,
        conclusion: format!("{who}'s {rel} will be {fy} years old"),
        answer: fy,
    }
}

/// A percentage of a group, and the rest of the group.
pub(super) fn fam_percent_group(g: &mut Gen) -> Draft {
    let (place, noun, yes, no) = g.pick(&[
        ("a class", "students", "wear glasses", "do not wear glasses"),
        (
            "an orchard",
            "trees",
            "are apple trees",
            "are not apple trees",
        ),
        ("a parking lot", "cars", "are red", "are not red"),
        ("a party", "guests", "are children", "are not children"),
        ("a library", "books", "are novels", "are not novels"),
    ]);
    let pct = g.pick(&[10, 20, 25, 50]);
    let k = 100 / pct;
    let n = k * g.int(2, 15);
    let (a, ea) = calc(n, Op::Div, k, false);
    let (b, eb) = calc(n, Op::Sub, a, false);
    Draft {
        prompt: format!(
            "There are {n} {noun} in {place}. {pct}% of the {noun} {yes}. How many {noun} {no}?"
        ),
        first: format!("how many {noun} {yes}"),
        steps: vec![
            format!("{pct}% of {n} is {ea} {noun}"),
            format!("so {eb} {noun} {no}"),
        ],
        conclusion: format!("{b} {noun} {no}"),
        answer: b,
    }
}

/// Daily output over weeks, sometimes turned into money.
pub(super) fn fam_production(g: &mut Gen) -> Draft {
    let (maker, goods) = g.pick(&[
        ("bakery", "loaves of bread"),
        ("farm", "eggs"),
        ("factory", "toys"),
        ("workshop", "chairs"),
    ]);
    let (a, w) = (g.int(5, 60), g.int(2, 6));
    let (week, ewk) = calc(a, Op::Mul, 7, false);
    let (t, et) = calc(week, Op::Mul, w, false);
    let head = format!("A {maker} makes {a} {goods} every day.");
    let mut steps = vec![
        format!("in one week, the {maker} makes {ewk} {goods}"),
        format!("in {w} weeks, it makes {et} {goods}"),
    ];
    let first = format!("how many {goods} the {maker} makes in one week");
    if g.chance(0.4) {
        let price = g.int(2, 9);
        let (money, em) = calc(price, Op::Mul, t, true);
        steps.push(format!("selling them brings in {em}"));
        return Draft {
            prompt: format!(
                "{head} It sells each one for ${price}. \
                 How much money does the {maker} make in {w} weeks?"
            ),
            first,
            steps,
            conclusion: format!("the {maker} makes ${money} in {w} weeks"),
            answer: money,
        };
    }
    Draft {
        prompt: format!("{head} How many {goods} does it make in {w} weeks?"),
        first,
        steps,
        conclusion: format!("the {maker} makes {t} {goods} in {w} weeks"),
        answer: t,
    }
}
